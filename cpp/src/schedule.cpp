// The reverse step of docs/bundle-format.md: float32 scalars once per sampler at load, then one loop per kind.
#include <algorithm>
#include <cmath>

#include "internal.hpp"

namespace dpkit {
namespace detail {

std::vector<StepCoefficients> make_steps(const Manifest& m, const SamplerEntry& s) {
  std::vector<StepCoefficients> steps;
  steps.reserve(s.timesteps.size());
  const bool ddim = s.sampler == "ddim";
  for (std::size_t k = 0; k < s.timesteps.size(); ++k) {
    const int64_t t = s.timesteps[k], p = s.prev_timesteps[k];
    const double level_t = m.alphas_cumprod[static_cast<std::size_t>(t)];
    const double level_p = p >= 0 ? m.alphas_cumprod[static_cast<std::size_t>(p)] : s.final_alpha_cumprod;
    // The step's scalars in float32 from the float32 alphas_cumprod, in diffusers' order (see internal.hpp).
    const float a_t = static_cast<float>(level_t), a_p = static_cast<float>(level_p);
    if (!(a_t < 1.0f) || !(a_p > 0.0f) || a_p > 1.0f)
      throw Error("scheduler sampler " + s.name + ": alphas_cumprod at step " + std::to_string(k) +
                  " gives a degenerate step (a_t = " + std::to_string(a_t) + ", a_p = " + std::to_string(a_p) +
                  " in float32)");
    const float beta_t = 1.0f - a_t, beta_p = 1.0f - a_p;
    StepCoefficients c;
    c.timestep = t;
    c.ddim = ddim;
    c.predicts_sample = m.prediction_type == "sample";
    c.sqrt_at = std::sqrt(a_t);
    c.sqrt_1m_at = std::sqrt(beta_t);
    if (s.sampler == "fewstep") {  // x0 re-noised to the next timestep with fresh noise (0 after the last step)
      c.c_x0 = std::sqrt(a_p);
      c.sigma = std::sqrt(beta_p);
    } else if (!ddim) {
      const float alpha = a_t / a_p, beta = 1.0f - alpha;  // this step's own alpha and beta
      c.c_x0 = std::sqrt(a_p) * beta / beta_t;
      c.c_x = std::sqrt(alpha) * beta_p / beta_t;
      c.sigma = t > 0 ? std::sqrt(std::max(beta_p / beta_t * beta, 1e-20f)) : 0.0f;
    } else {  // eta = 0
      c.c_x0 = std::sqrt(a_p);
      c.c_eps = std::sqrt(beta_p);
    }
    // Inpainting's noise levels: square roots in double, as the Python homes take them.
    c.level_in = {static_cast<float>(std::sqrt(level_t)), static_cast<float>(std::sqrt(1.0 - level_t))};
    c.level_out = {static_cast<float>(std::sqrt(level_p)), static_cast<float>(std::sqrt(1.0 - level_p))};
    steps.push_back(c);
  }
  return steps;
}

// Every product and sum below is rounded to float32 where diffusers rounds it: no reciprocal for the
// division, no fused multiply-add (CMakeLists builds this file with -ffp-contract=off).
void apply_step(const StepCoefficients& c, bool clip, float r, float* __restrict x, const float* __restrict out,
                const float* __restrict noise, std::size_t n) {
  // Branches are hoisted out of the element loops so each loop is a straight vectorizable body.
  const float lo = clip ? -r : -INFINITY, hi = clip ? r : INFINITY;
  const float s1 = c.sqrt_1m_at, s0 = c.sqrt_at;
  if (c.predicts_sample) {  // out is x0; DDIM derives eps from it before the clamp, as diffusers does
    if (c.ddim) {
      for (std::size_t i = 0; i < n; ++i) {
        const float eps = (x[i] - s0 * out[i]) / s1;
        const float x0 = std::min(std::max(out[i], lo), hi);
        x[i] = c.c_x0 * x0 + c.c_eps * eps;
      }
    } else if (c.sigma > 0.0f) {
      for (std::size_t i = 0; i < n; ++i) {
        const float x0 = std::min(std::max(out[i], lo), hi);
        x[i] = (c.c_x0 * x0 + c.c_x * x[i]) + c.sigma * noise[i];
      }
    } else {
      for (std::size_t i = 0; i < n; ++i) {
        const float x0 = std::min(std::max(out[i], lo), hi);
        x[i] = c.c_x0 * x0 + c.c_x * x[i];
      }
    }
  } else if (c.ddim) {
    for (std::size_t i = 0; i < n; ++i) {
      const float x0 = std::min(std::max((x[i] - s1 * out[i]) / s0, lo), hi);
      x[i] = c.c_x0 * x0 + c.c_eps * out[i];
    }
  } else if (c.sigma > 0.0f) {
    for (std::size_t i = 0; i < n; ++i) {
      const float x0 = std::min(std::max((x[i] - s1 * out[i]) / s0, lo), hi);
      x[i] = (c.c_x0 * x0 + c.c_x * x[i]) + c.sigma * noise[i];
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const float x0 = std::min(std::max((x[i] - s1 * out[i]) / s0, lo), hi);
      x[i] = c.c_x0 * x0 + c.c_x * x[i];
    }
  }
}

void apply_inpaint(const Inpaint& p, float sqrt_a, float sqrt_1m_a, float* x, const float* x_init, int batch,
                   int horizon, int action_dim) {
  const std::size_t A = static_cast<std::size_t>(action_dim);
  for (int b = 0; b < batch; ++b) {
    const std::size_t row0 = (static_cast<std::size_t>(b) * horizon + p.start) * A;
    const float* v = p.prefix + static_cast<std::size_t>(b) * p.rows * A;
    for (int j = 0; j < p.rows; ++j) {
      const float w = p.weights[j], keep = 1.0f - w;
      for (std::size_t a = 0; a < A; ++a) {
        const std::size_t i = row0 + j * A + a;
        const float known = sqrt_a * v[j * A + a] + sqrt_1m_a * x_init[i];
        x[i] = w * known + keep * x[i];
      }
    }
  }
}

}  // namespace detail
}  // namespace dpkit
