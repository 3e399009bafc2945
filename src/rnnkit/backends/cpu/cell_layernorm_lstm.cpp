// The LayerNorm LSTM's drivers, in float32 and float64.
#include "driver.h"

namespace rnnkit {
namespace cpu {

RNNKIT_INSTANTIATE(LayerNormLstm);

}  // namespace cpu
}  // namespace rnnkit
