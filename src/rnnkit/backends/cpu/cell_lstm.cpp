// The LSTM's drivers (plain and projected), in float32 and float64.
#include "driver.h"

namespace rnnkit {
namespace cpu {

RNNKIT_INSTANTIATE(PlainLstm);

}  // namespace cpu
}  // namespace rnnkit
