// What the op entries (ops.cpp) and the drivers (driver.h, instantiated per cell in cell_*.cpp)
// share: the weight slots, the arguments of one direction's forward and backward as typed
// pointers, the compile-time variants, and the two entry points per cell.
//
// Shapes, in single letters: T steps, B batch, I input features, H hidden size, P state size
// (P = H except for a projected LSTM, where P = proj_size), G = gates * H, S = saved activations
// per step (the cell's saved * H). Every array is contiguous, row-major, time-major; a row of a
// (T, B, .) array is t * B + b.
#pragma once

#include <cstdint>

#include "kernel_common.h"

namespace rnnkit {
namespace cpu {

// One direction's weights, by slot. A cell takes the slots it names (Cell::kWeights, the order
// of its weights in the cell table); a slot it does not take, or a bias or projection the layer
// was built without, is nullptr.
enum Slot : int {
  kWeightIh,    // w_ih (G, I)
  kWeightHh,    // w_hh (G, P)
  kBiasIh,      // b_ih (G)
  kBiasHh,      // b_hh (G)
  kWeightHr,    // w_hr (P, H): the projection of a projected LSTM
  kWeightCi,    // w_ci (H): peepholes, i sees c_{t-1}
  kWeightCf,    // w_cf (H): f sees c_{t-1}
  kWeightCo,    // w_co (H): o sees c_t
  kLnIhWeight,  // (G) gain of the input-side LayerNorm
  kLnIhBias,    // (G) its bias
  kLnHhWeight,  // (G) gain of the recurrent LayerNorm
  kLnHhBias,    // (G) its bias
  kLnCWeight,   // (H) gain of the cell-state LayerNorm
  kLnCBias,     // (H) its bias
  kSlots
};

// The activations a forward keeps for its backward, (T, B, width) each; nullptr when the call
// does not save (or the cell does not use it). In the order the ops return them.
enum SavedSlot : int {
  kAct,    // (S) the gates after their nonlinearity: lstm i f g o, gru r z n hn, rnn h_new
  kHprev,  // (P) the state entering the step at t (before state dropout's mask)
  kC,      // (H) the new cell state, before zoneout [a cell state]
  kCprev,  // (H) the cell state entering the step [a cell state, with zoneout or peepholes]
  kHpre,   // (H) o * tanh(c) before the projection [projected LSTM]
  kXhat,   // (G) the normalised W_ih x_t [LayerNorm]
  kHhat,   // (G) the normalised W_hh h_{t-1} [LayerNorm]
  kChat,   // (H) the normalised c_t [LayerNorm LSTM]
  kRstd,   // (3) 1 / sqrt(var + eps) of the input-side, recurrent and cell LayerNorm [LayerNorm]
  kSavedSlots
};
constexpr int64_t kStats = 3;  // the width of kRstd

template <typename T>
struct Saved {
  T* at[kSavedSlots] = {};
};

template <typename T>
struct ConstSaved {
  const T* at[kSavedSlots] = {};
};

// State dropout and zoneout of one direction (each nullptr when off): mask (B, P) multiplies the
// state entering each step; zone_h (T, B, P) / zone_c (T, B, H) hold zoneout's keep weights per
// step (training: 0 or 1), or (P) / (H) the same at every step (eval: the probabilities), the
// step of a row being zone_*_step (P or H) or 0.
template <typename T>
struct Masks {
  const T* mask = nullptr;
  const T* zone_h = nullptr;
  const T* zone_c = nullptr;
  int64_t zone_h_step = 0, zone_c_step = 0;
};

// The compile-time variants of a call.
struct Variants {
  bool lengths;        // lengths given: finished sequences keep their state, output 0
  bool projection;     // a projected LSTM (w_hr)
  bool saving;         // the forward keeps what backward needs
  bool state_dropout;  // h_{t-1} * mask enters the step
  bool zoneout;        // zoneout on h (and c)
};

// One direction over the whole sequence. Step s (0 <= s < max length) reads time t = s, or in
// reverse t = len_b - 1 - s (T - 1 - s without lengths); a sequence b with s >= len_b has
// finished: its state is kept, its output is 0 (out must come zeroed with lengths).
template <typename T>
struct ForwardArgs {
  Shape n;
  bool reverse = false;
  const int64_t* len = nullptr;  // (B) with lengths, else nullptr
  T eps = T(0);                  // the LayerNorms' epsilon
  GemmPlan gemm;                 // where the GEMMs come from, and in which precision
  const T* x = nullptr;          // (T, B, I)
  const T* w[kSlots] = {};
  Masks<T> masks;
  T* out = nullptr;  // (T, B, P)
  T* h = nullptr;    // (B, P): h0 in, h_n out
  T* c = nullptr;    // (B, H): c0 in, c_n out [a cell state]
  Saved<T> saved;    // with lengths, zeroed: the final GEMMs read padded rows
};

// Its backward: the forward read in reverse, one derivative per line, the weight gradients as
// single GEMMs over all steps at the end.
template <typename T>
struct BackwardArgs {
  Shape n;
  bool reverse = false;
  const int64_t* len = nullptr;
  T eps = T(0);
  GemmPlan gemm;
  const T* gout = nullptr;  // (T, B, P) the gradient reaching out, or nullptr (zero)
  const T* x = nullptr;     // (T, B, I)
  const T* c0 = nullptr;    // (B, H) [a cell state]
  const T* w[kSlots] = {};
  Masks<T> masks;
  ConstSaved<T> saved;
  T* dx = nullptr;     // (T, B, I), or nullptr when not needed
  T* dh = nullptr;     // (B, P): the gradient reaching h_n in, reaching h0 out
  T* dc = nullptr;     // (B, H): likewise c_n and c0 [a cell state]
  T* dw[kSlots] = {};  // the weights' gradients, nullptr where w is
};

// The cells (cells.h), by kernel id (the cell table's kernel_id).
template <bool kRelu>
struct Elman;
using RnnTanh = Elman<false>;
using RnnRelu = Elman<true>;
template <bool kPeephole>
struct Lstm;
using PlainLstm = Lstm<false>;
using PeepholeLstm = Lstm<true>;
struct Gru;
struct LayerNormLstm;
struct LayerNormGru;

// The drivers of a cell (driver.h), compiled in the cell's own translation unit.
template <typename Cell, typename T>
void run_forward(const Variants& v, const ForwardArgs<T>& a);
template <typename Cell, typename T>
void run_backward(const Variants& v, const BackwardArgs<T>& a);

}  // namespace cpu
}  // namespace rnnkit
