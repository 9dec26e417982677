#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "internal.hpp"

using dpkit::detail::sha256_file_hex;
using dpkit::detail::sha256_hex;

TEST(Sha256, KnownVectors) {  // FIPS 180-4 examples
  EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // Lengths around the padding boundaries (55/56 bytes: length fits / spills into a second block);
  // expected values from Python's hashlib for bytes (i * 7) % 256.
  const std::pair<int, const char*> boundary[] = {
      {55, "576a1bf8d4478657e6dc4af9398544765c2a92cde28478b019235cfed315fc09"},
      {56, "9b20501dfd1d99161c257950f3444f3e49230c351c5c8e0943ef369f85f5205d"},
      {63, "30b345906b493f06f69444b6521113511c242f30e29840462950035043682f1e"},
      {64, "d8bc63b4fc1156e5e7d95a418b9bf54cd3174bedbc2db40f74895349b229b3c0"},
      {65, "1ee23b0fbcaecc1aff4a9e8f1645f35ab2c8e13609cd73b68df8b5e3f63ce073"},
      {120, "655250427d56b1b0eeb8497d21428704273458a01772d6881b65c0abac0f8a98"}};
  for (const auto& [n, hex] : boundary) {
    std::string data;
    for (int i = 0; i < n; ++i) data += static_cast<char>((i * 7) % 256);
    EXPECT_EQ(sha256_hex(data.data(), data.size()), hex) << n << " bytes";
  }
  const std::string million(1000000, 'a');
  EXPECT_EQ(sha256_hex(million.data(), million.size()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, FileMatchesBuffer) {
  const std::string path = testing::TempDir() + "/dpkit_sha.bin";
  std::string data;
  for (int i = 0; i < 200000; ++i) data += static_cast<char>(i * 7);
  std::ofstream(path, std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size()));
  EXPECT_EQ(sha256_file_hex(path), sha256_hex(data.data(), data.size()));
}

TEST(Sha256, MissingFileNamesIt) {
  try {
    sha256_file_hex("/nonexistent/dpkit.onnx");
    FAIL() << "no error";
  } catch (const dpkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dpkit.onnx"), std::string::npos);
  }
}
