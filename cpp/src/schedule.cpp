// The reverse step of docs/bundle-format.md: coefficients once per sampler at load, then a fused loop.
#include <algorithm>
#include <cmath>

#include "internal.hpp"

namespace dpkit {
namespace detail {

std::vector<StepCoefficients> make_steps(const Manifest& m, const SamplerEntry& s) {
  std::vector<StepCoefficients> steps;
  steps.reserve(s.timesteps.size());
  for (std::size_t k = 0; k < s.timesteps.size(); ++k) {
    const int64_t t = s.timesteps[k], p = s.prev_timesteps[k];
    // Double precision here: these run once, and the loop then only multiplies floats.
    const double a_t = m.alphas_cumprod[static_cast<std::size_t>(t)];
    const double a_p = p >= 0 ? m.alphas_cumprod[static_cast<std::size_t>(p)] : s.final_alpha_cumprod;
    if (!(a_t < 1.0) || !(a_p > 0.0) || a_p > 1.0)
      throw Error("scheduler sampler " + s.name + ": alphas_cumprod at step " + std::to_string(k) +
                  " gives a degenerate step (a_t = " + std::to_string(a_t) + ", a_p = " + std::to_string(a_p) + ")");
    StepCoefficients c;
    c.timestep = t;
    c.sqrt_1m_at = static_cast<float>(std::sqrt(1.0 - a_t));
    c.inv_sqrt_at = static_cast<float>(1.0 / std::sqrt(a_t));
    c.sqrt_at = static_cast<float>(std::sqrt(a_t));
    c.sqrt_ap = static_cast<float>(std::sqrt(a_p));
    c.sqrt_1m_ap = static_cast<float>(std::sqrt(1.0 - a_p));
    if (s.sampler == "ddpm") {
      const double b_t = 1.0 - a_t / a_p;
      c.c_x0 = static_cast<float>(std::sqrt(a_p) * b_t / (1.0 - a_t));
      c.c_x = static_cast<float>(std::sqrt(a_t / a_p) * (1.0 - a_p) / (1.0 - a_t));
      c.sigma = t > 0 ? static_cast<float>(std::sqrt(std::max((1.0 - a_p) / (1.0 - a_t) * b_t, 1e-20))) : 0.0f;
    } else {  // ddim, eta = 0
      c.c_x0 = static_cast<float>(std::sqrt(a_p));
      c.c_eps = static_cast<float>(std::sqrt(1.0 - a_p));
    }
    steps.push_back(c);
  }
  return steps;
}

void apply_step(const StepCoefficients& c, bool clip, float r, float* __restrict x, const float* __restrict eps,
                const float* __restrict noise, std::size_t n) {
  // Branches are hoisted out of the element loops so each loop is a straight vectorizable body.
  const float lo = clip ? -r : -INFINITY, hi = clip ? r : INFINITY;
  if (c.sigma > 0.0f) {
    for (std::size_t i = 0; i < n; ++i) {
      const float x0 = std::min(std::max((x[i] - c.sqrt_1m_at * eps[i]) * c.inv_sqrt_at, lo), hi);
      x[i] = c.c_x0 * x0 + c.c_x * x[i] + c.c_eps * eps[i] + c.sigma * noise[i];
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const float x0 = std::min(std::max((x[i] - c.sqrt_1m_at * eps[i]) * c.inv_sqrt_at, lo), hi);
      x[i] = c.c_x0 * x0 + c.c_x * x[i] + c.c_eps * eps[i];
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
