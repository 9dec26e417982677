// Internal pieces of the runtime, declared here so the unit tests can reach them. Not installed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dpkit/runtime.hpp"

namespace dpkit {
namespace detail {

// ---- sha256 (FIPS 180-4), self-written so the runtime needs no crypto library -------------------------
std::string sha256_hex(const void* data, std::size_t size);
std::string sha256_file_hex(const std::string& path);  // Error naming the file when it cannot be read

// ---- policy.json ---------------------------------------------------------------------------------------
struct ModelEntry {
  std::string file;
  std::string sha256;
  std::vector<std::string> inputs;
  std::vector<std::string> outputs;
  std::string dtype;
  // "fp32" | "fp16" | "int8": `precision`, or from dtype when absent (bundles from before int8).
  std::string precision;
};

struct SamplerEntry {
  std::string name;
  std::string sampler;  // "ddpm" | "ddim"
  int num_inference_steps = 0;
  std::vector<int64_t> timesteps;
  std::vector<int64_t> prev_timesteps;
  double final_alpha_cumprod = 1.0;
  double eta = 0.0;
};

struct Manifest {
  std::string obs_mode;
  int n_obs_steps = 0, horizon = 0, n_action_steps = 0, action_dim = 0, first_action_index = 0, cond_dim = 0;
  std::vector<ObservationInfo> observations;
  std::vector<float> action_scale, action_offset;
  // scheduler
  int num_train_timesteps = 0;
  std::string prediction_type, variance_type;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  std::vector<double> betas, alphas_cumprod;
  std::vector<SamplerEntry> samplers;
  int default_sampler = 0;
  ModelEntry encoder, denoiser;
  // models.<graph>.external_data: (file, sha256) of every file beside the graph its tensors load.
  std::vector<std::pair<std::string, std::string>> encoder_external_data, denoiser_external_data;
  // `tensorrt` (dpkit-export writes it always): ORT's engine cache folder inside the bundle, the
  // optimization profile (batch min/opt/max) and precision engines are built with, and whether
  // dpkit-export --tensorrt built them already (else ORT builds them at the first load, same profile).
  bool has_tensorrt = false;
  std::string tensorrt_precision;
  std::string tensorrt_cache_dir = "trt_cache";
  int tensorrt_max_batch = 0;
  int tensorrt_min_batch = 0, tensorrt_opt_batch = 0;
  bool tensorrt_engines = false;
};

// Parse and validate policy.json text; `where` (the file path) prefixes every error message.
Manifest parse_manifest(const std::string& json_text, const std::string& where);
Manifest load_manifest(const std::string& bundle_dir);

// ---- the reverse step (docs/bundle-format.md) ----------------------------------------------------------
// Per-step coefficients computed once at load from the manifest arrays, so that a step is
//   x0 = clamp((x - sqrt_1m_at * eps) * inv_sqrt_at, -r, r)      (clamp only when clip)
//   x  = c_x0 * x0 + c_x * x + c_eps * eps + sigma * noise        (sigma = 0: no noise term)
// DDPM has c_eps = 0; DDIM (eta = 0) has c_x = 0 and sigma = 0.
// For inpainting, the noise levels around the step: sqrt(alpha_cumprod) of its input (timestep; for
// step 0 that is the initial sample's level) and of its output (prev timestep, or the sampler's
// final_alpha_cumprod after the last step).
struct StepCoefficients {
  int64_t timestep = 0;
  float sqrt_1m_at = 0, inv_sqrt_at = 0;
  float c_x0 = 0, c_x = 0, c_eps = 0, sigma = 0;
  float sqrt_at = 0, sqrt_ap = 0, sqrt_1m_ap = 0;
};

std::vector<StepCoefficients> make_steps(const Manifest& m, const SamplerEntry& s);

// One reverse step over n floats, in place on x. `noise` may be null when step.sigma == 0.
void apply_step(const StepCoefficients& step, bool clip, float clip_range, float* x, const float* eps,
                const float* noise, std::size_t n);

// Inpainting (dpkit.runtime.sampling.Inpaint.apply): rows start .. start + rows - 1 of every batch item
// of x (batch, horizon, A) become  w_j * (sqrt_a * prefix_j + sqrt_1m_a * x_init_j) + (1 - w_j) * x_j,
// the committed prefix (batch, rows, A) noised to the level x is at with the initial sample's own noise.
struct Inpaint {
  const float* prefix = nullptr;   // (batch, rows, A), normalized
  const float* weights = nullptr;  // (rows,) in [0, 1]
  int start = 0, rows = 0;
};
void apply_inpaint(const Inpaint& p, float sqrt_a, float sqrt_1m_a, float* x, const float* x_init, int batch,
                   int horizon, int action_dim);

}  // namespace detail
}  // namespace dpkit
