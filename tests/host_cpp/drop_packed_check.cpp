// cf_drop_packed (kernels_cu/cf_drop_packed.cuh) on the host: the header compiled as C++20
// with the warp's 32 lanes as threads (__shfl_xor_sync through a barrier), against drop_p
// followed by packing, word for word, and each element against cf_dropout_byte's definition.
// And cf_drop_ring.cuh: a slot of a 48-row tile filled by 1-7 workers, then a warp's lanes
// masking their words from it, against cf_drop_packed's words; and the backward's slot (keys
// as rows) against each lane's Dropout::keep_bits<NT, true> (NT 16 and 8).
// Built and run by tests/test_drop_packed_host.py; argv[1] seeds the draws. Exit 0: equal.
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#define __device__
#define __forceinline__ inline
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned long long)a * b >> 32; }
static inline unsigned int __ldg(const unsigned int* p) { return *p; }
static unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  unsigned long long both = (unsigned long long)y << 32 | x; unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned int)(both >> (8 * (s >> (4 * i) & 7)) & 0xff) << (8 * i);
  return r;
}
thread_local int lane_id;
static unsigned int shfl_buf[32];
static std::barrier<>* bar;
static unsigned int __shfl_xor_sync(unsigned int, unsigned int v, int m) {
  shfl_buf[lane_id] = v; bar->arrive_and_wait();
  unsigned int r = shfl_buf[lane_id ^ m]; bar->arrive_and_wait(); return r;
}
struct float2 { float x, y; };
struct uint4 { unsigned int x, y, z, w; };
static uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
static float2 make_float2(float x, float y) { return {x, y}; }
#include <cmath>
#define CF_DROPOUT 1
#include "cf_drop_ring.cuh"
static unsigned int bf16(float f) { unsigned int u; memcpy(&u, &f, 4); return (u + 0x7fff + ((u >> 16) & 1)) >> 16; }
static unsigned int pack2(float lo, float hi) { return bf16(lo) | bf16(hi) << 16; }
int main(int argc, char** argv) {
  std::mt19937_64 rng(argc > 1 ? atoll(argv[1]) : 1);
  std::barrier<> b(32); bar = &b;
  long bad = 0, words = 0, dropped = 0, ring_bad = 0;
  alignas(16) static unsigned char slot[DropRingTile<48, 128>::kBytes];
  for (int trial = 0; trial < 400; ++trial) {
    const unsigned int thr = 1 + rng() % 255, bh = rng() % 1000;
    const unsigned long long seed = rng(); const unsigned int off = rng();
    const int row_base = 16 * (rng() % 512), col_base = 128 * (rng() % 64);
    std::vector<float> p(32 * 64); for (auto& x : p) x = (float)(rng() % 100000) / 777.f + 0.5f;
    std::vector<unsigned int> a_ref(32 * 32), a_new(32 * 32), a_ring(32 * 32);
    const int w = rng() % 3, workers = 1 + rng() % 7;  // the warp of the 48-row tile; drawers
    {
      const Dropout drop{cf_dropout{(unsigned int)seed, (unsigned int)(seed >> 32), off, thr}, 1.f, 0};
      memset(slot, 0x5a, sizeof slot);
      for (int worker = 0; worker < workers; ++worker)
        cf_drop_ring_fill<48, 128>(drop, slot, bh, row_base, col_base, worker, workers);
    }
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < 32; ++lane) lanes.emplace_back([&, lane] {
      lane_id = lane;
      const Dropout drop{cf_dropout{(unsigned int)seed, (unsigned int)(seed >> 32), off, thr}, 1.f, 0};
      const int r0 = row_base + 16 * w + lane / 4, c0 = col_base + 2 * (lane % 4);
      float f[16][4]; for (int t = 0; t < 16; ++t) for (int e = 0; e < 4; ++e) f[t][e] = p[lane * 64 + 4 * t + e];
      unsigned int a[8][4];
      for (int k = 0; k < 8; ++k) { a[k][0] = pack2(f[2*k][0], f[2*k][1]); a[k][1] = pack2(f[2*k][2], f[2*k][3]);
        a[k][2] = pack2(f[2*k+1][0], f[2*k+1][1]); a[k][3] = pack2(f[2*k+1][2], f[2*k+1][3]); }
      unsigned int ring[8][4];
      memcpy(ring, a, sizeof a);
      cf_drop_ring_apply(ring, slot + w * 4 * 512, lane);
      cf_drop_packed(drop, a, bh, r0, c0);
      for (int k = 0; k < 8; ++k) for (int e = 0; e < 4; ++e) a_ring[lane * 32 + 4 * k + e] = ring[k][e];
      drop.drop_p(f, bh, r0, c0);
      for (int k = 0; k < 8; ++k) {
        unsigned int ref[4] = {pack2(f[2*k][0], f[2*k][1]), pack2(f[2*k][2], f[2*k][3]),
                               pack2(f[2*k+1][0], f[2*k+1][1]), pack2(f[2*k+1][2], f[2*k+1][3])};
        for (int e = 0; e < 4; ++e) { a_ref[lane * 32 + 4 * k + e] = ref[e]; a_new[lane * 32 + 4 * k + e] = a[k][e]; }
      }
      // and each element against the byte definition
      for (int t = 0; t < 16; ++t) for (int e = 0; e < 4; ++e) {
        const int i = r0 + 8 * (e >> 1), j = c0 + 8 * t + (e & 1);
        const bool kept = cf_dropout_byte(drop.d, bh, i, j) >= thr;
        const unsigned int w = a[t / 2][2 * (t & 1) + (e >> 1)], half = (e & 1) ? w >> 16 : w & 0xffff;
        if (kept != (half != 0)) __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
        if (!kept) __atomic_add_fetch(&dropped, 1, __ATOMIC_RELAXED);
      }
    });
    for (auto& t : lanes) t.join();
    // the backward's slot: two consumer warps' keys, NT fragments of 8 queries
    for (int nt : {16, 8}) {
      alignas(16) static unsigned char keys_slot[2 * 32 * 8];
      const Dropout drop{cf_dropout{(unsigned int)seed, (unsigned int)(seed >> 32), off, thr}, 1.f, 0};
      memset(keys_slot, 0x5a, sizeof keys_slot);
      for (int worker = 0; worker < workers; ++worker) {
        if (nt == 16) cf_drop_ring_fill_keys<2, 16>(drop, keys_slot, bh, row_base, col_base, worker, workers);
        else cf_drop_ring_fill_keys<2, 8>(drop, keys_slot, bh, row_base, col_base, worker, workers);
      }
      const int kw = w % 2;
      std::vector<std::thread> klanes;
      for (int lane = 0; lane < 32; ++lane) klanes.emplace_back([&, lane] {
        lane_id = lane;
        const int r0 = row_base + 16 * kw + lane / 4, c0 = col_base + 2 * (lane % 4);
        const unsigned long long want = nt == 16 ? drop.keep_bits<16, true>(bh, r0, c0)
                                                 : drop.keep_bits<8, true>(bh, r0, c0);
        unsigned long long got;
        memcpy(&got, keys_slot + (kw * 32 + lane) * 8, 8);
        if (nt == 8) got &= 0xffffffffull;
        if (got != want) __atomic_add_fetch(&ring_bad, 1, __ATOMIC_RELAXED);
      });
      for (auto& t : klanes) t.join();
    }
    for (size_t n = 0; n < a_ref.size(); ++n, ++words) {
      bad += a_ref[n] != a_new[n];
      ring_bad += a_ring[n] != a_new[n];
    }
  }
  printf("words %ld, mismatches %ld, ring mismatches %ld, dropped elements %ld\n", words, bad,
         ring_bad, dropped);
  return bad != 0 || ring_bad != 0;
}
