// String options of the ops as enums, parsed once on the host by both backends.
#pragma once

#include "stable.h"

#include <string>

namespace ppoison {

enum class Oracle : int { Extreme = 0, Argmax = 1, Argmin = 2, Random = 3 };
enum class YDist : int { L1 = 0, L2 = 1, KL = 2 };

inline Oracle parse_oracle(std::string_view s) {
  if (s == "extreme") return Oracle::Extreme;
  if (s == "argmax") return Oracle::Argmax;
  if (s == "argmin") return Oracle::Argmin;
  if (s == "random") return Oracle::Random;
  PPOISON_CHECK(false, "ppoison: oracle must be one of 'extreme', 'argmax', 'argmin', 'random', got '",
                    std::string(s), "'");
  return Oracle::Extreme;
}

inline YDist parse_ydist(std::string_view s) {
  if (s == "l1") return YDist::L1;
  if (s == "l2") return YDist::L2;
  if (s == "kl") return YDist::KL;
  PPOISON_CHECK(false, "ppoison: ydist must be one of 'l1', 'l2', 'kl', got '", std::string(s), "'");
  return YDist::L1;
}

}  // namespace ppoison
