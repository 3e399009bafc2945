// The GRU's drivers, in float32 and float64.
#include "driver.h"

namespace rnnkit {
namespace cpu {

RNNKIT_INSTANTIATE(Gru);

}  // namespace cpu
}  // namespace rnnkit
