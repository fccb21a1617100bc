"""Measured kernel settings per shape on a GPU; read by `pallas_kernels.dispatch` only.

Regenerate from a GPU run: `scripts/gpu_check.sh` writes an updated copy of this file to
$OUT/tuning.py (its measured sweeps and kernel-vs-XLA timings merged into the entries below);
review the diff and commit it here. Every entry says where its numbers came from; shapes
without an entry use the dispatch's fallback (XLA for the op, heuristic blocks), which is
unmeasured by definition.

UNMERGED[(out, in)] = list of entries, each for row counts N <= n_max (ascending):
  impl: "pallas" | "mosaic" | "reference" (XLA): the fastest measured at that N;
  blocks: keyword arguments of `lora_unmerged_pallas` (mosaic_blocks: of the Mosaic kernel).
SWITCH[(out, in)]: blocks of `merge_delta_pallas`.
"""

# fmt: off
DEVICE = 'NVIDIA H200'
JAX = '0.11.2'
DATE = '2026-11-26'

UNMERGED = {(4096, 4096): [{'n_max': 1,
                 'impl': 'reference',
                 'blocks': {'block_rows': 16,
                            'block_out': 32,
                            'block_k': 256,
                            'split_k': 1,
                            'num_warps': 4,
                            'num_stages': 3},
                 'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (22.4 vs 39.2 us per '
                           'call in a loop); blocks best of an 8-candidate sweep (W fits in L2)'},
                {'n_max': 16,
                 'impl': 'reference',
                 'blocks': {'block_rows': 16,
                            'block_out': 32,
                            'block_k': 256,
                            'split_k': 1,
                            'num_warps': 4,
                            'num_stages': 3},
                 'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (24.8 vs 53.5 us)'}],
 (11008, 4096): [{'n_max': 1,
                  'impl': 'reference',
                  'blocks': {'block_rows': 16,
                             'block_out': 64,
                             'block_k': 256,
                             'split_k': 1,
                             'num_warps': 8,
                             'num_stages': 3},
                  'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (50.8 vs 74.4 us); '
                            'blocks best of an 8-candidate sweep'},
                 {'n_max': 16,
                  'impl': 'reference',
                  'blocks': {'block_rows': 16,
                             'block_out': 64,
                             'block_k': 256,
                             'split_k': 1,
                             'num_warps': 8,
                             'num_stages': 3},
                  'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (48.0 vs 87.0 us)'}],
 (4096, 11008): [{'n_max': 16,
                  'impl': 'reference',
                  'blocks': {'block_rows': 16,
                             'block_out': 16,
                             'block_k': 256,
                             'split_k': 1,
                             'num_warps': 4,
                             'num_stages': 4},
                  'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (47.8 vs 158.6 us); '
                            'blocks unmeasured'}]}

SWITCH = {(4096, 4096): {'blocks': {'block_out': 32,
                           'block_in': 256,
                           'steps': 1,
                           'num_warps': 4,
                           'num_stages': 2},
                'source': 'run1 H200 2026-11-26: best of a 7-candidate sweep, 1.04 ms for 32 '
                          'layers (2.1 TB/s, 76% of copy) vs 1.26 ms with 64 x 64 tiles'}}
