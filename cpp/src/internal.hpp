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
  bool precision_declared = false;  // policy.json has the `precision` key (else it is implied by dtype)
};

struct SamplerEntry {
  std::string name;
  std::string sampler;  // "ddpm" | "ddim" | "fewstep"
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
  std::string prediction_type = "epsilon", variance_type;  // prediction_type: "epsilon" or "sample" (x0)
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
// Per-step float32 scalars computed once at load from the manifest arrays (a_t, a_p: alphas_cumprod of the
// timestep and of the prev timestep or final_alpha_cumprod, rounded to float32), as diffusers computes them:
//   sqrt_at = sqrt(a_t), sqrt_1m_at = sqrt(1 - a_t)
//   DDPM: alpha = a_t / a_p, beta = 1 - alpha, c_x0 = sqrt(a_p) * beta / (1 - a_t),
//         c_x = sqrt(alpha) * (1 - a_p) / (1 - a_t), sigma = sqrt(max((1 - a_p) / (1 - a_t) * beta, 1e-20))
//         (0 at t = 0)
//   DDIM (eta = 0): c_x0 = sqrt(a_p), c_eps = sqrt(1 - a_p)
// so that a step is, in float32 and in this order (diffusers' DDPMScheduler/DDIMScheduler.step), for the
// denoiser's output `out`:
//   x0 = (x - sqrt_1m_at * out) / sqrt_at, eps = out         prediction_type "epsilon"
//   x0 = out, eps = (x - sqrt_at * x0) / sqrt_1m_at          prediction_type "sample" (eps: DDIM only)
//   x0 = clamp(x0, -r, r)                                     (clamp only when clip)
//   x  = c_x0 * x0 + c_x * x  (+ sigma * noise)                DDPM, and few-step (c_x = 0)
//   x  = c_x0 * x0 + c_eps * eps                               DDIM (eps from before the clamp)
// For inpainting, the noise levels around the step, sqrt(alpha_cumprod) and sqrt(1 - alpha_cumprod) taken in
// double: of its input (level_in: the timestep's; for step 0 that is the initial sample's level) and of its
// output (level_out: the prev timestep's, or the sampler's final_alpha_cumprod after the last step).
struct NoiseLevel {
  float sqrt_a = 1, sqrt_1m_a = 0;
};
struct StepCoefficients {
  int64_t timestep = 0;
  bool ddim = false;
  bool predicts_sample = false;  // the denoiser outputs x0 (prediction_type "sample"), else epsilon
  float sqrt_at = 1, sqrt_1m_at = 0;
  float c_x0 = 0, c_x = 0, c_eps = 0, sigma = 0;
  NoiseLevel level_in, level_out;
};

std::vector<StepCoefficients> make_steps(const Manifest& m, const SamplerEntry& s);

// One reverse step over n floats, in place on x; `out` is the denoiser's output. `noise` may be null when
// step.sigma == 0.
void apply_step(const StepCoefficients& step, bool clip, float clip_range, float* x, const float* out,
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
