// The Elman RNN's drivers (tanh and relu), in float32 and float64.
#include "driver.h"

namespace rnnkit {
namespace cpu {

RNNKIT_INSTANTIATE(RnnTanh);
RNNKIT_INSTANTIATE(RnnRelu);

}  // namespace cpu
}  // namespace rnnkit
