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
                 'impl': 'pallas',
                 'blocks': {'block_rows': 16,
                            'block_out': 32,
                            'block_k': 256,
                            'split_k': 1,
                            'num_warps': 4,
                            'num_stages': 3},
                 'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: mosaic 34.7 us, reference 26.8 us, '
                           'pallas 32.6 us (pallas blocks: best of the N=1 sweep); end to end (7B '
                           'decode b1, 32 layers, same run) pallas 5.79 ms/token (samples '
                           '11.8/5.79/4.90) vs reference 6.30 (10.5/6.30/5.45): the model-level '
                           'decode decides N=1'},
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
 (4096, 11008): [{'n_max': 1,
                  'impl': 'pallas',
                  'blocks': {'block_rows': 16,
                             'num_warps': 4,
                             'num_stages': 3,
                             'block_out': 32,
                             'block_k': 256,
                             'split_k': 2},
                  'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: mosaic 49.0 us, reference 40.9 us, '
                            'pallas 43.1 us (pallas blocks: best of the N=1 sweep); end to end (7B '
                            'decode b1, 32 layers, same run) pallas 5.79 ms/token (samples '
                            '11.8/5.79/4.90) vs reference 6.30 (10.5/6.30/5.45): the model-level '
                            'decode decides N=1'},
                 {'n_max': 16,
                  'impl': 'reference',
                  'blocks': {'block_rows': 16,
                             'block_out': 16,
                             'block_k': 256,
                             'split_k': 1,
                             'num_warps': 4,
                             'num_stages': 4},
                  'source': 'run1 H200 2026-11-26: previous kernel, XLA faster (47.8 vs 158.6 us); '
                            'blocks unmeasured'}],
 (12288, 4096): [{'n_max': 1,
                  'impl': 'pallas',
                  'blocks': {'block_rows': 16,
                             'block_out': 32,
                             'block_k': 256,
                             'split_k': 1,
                             'num_warps': 4,
                             'num_stages': 3},
                  'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: mosaic 52.2 us, reference 34.9 us, '
                            'pallas 53.1 us (pallas blocks: best of the N=1 sweep); end to end (7B '
                            'decode b1, 32 layers, same run) pallas 5.79 ms/token (samples '
                            '11.8/5.79/4.90) vs reference 6.30 (10.5/6.30/5.45): the model-level '
                            'decode decides N=1'}],
 (22016, 4096): [{'n_max': 1,
                  'impl': 'pallas',
                  'blocks': {'block_rows': 16,
                             'num_warps': 4,
                             'num_stages': 4,
                             'block_out': 32,
                             'block_k': 128,
                             'split_k': 1},
                  'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: mosaic 76.1 us, reference 56.7 us, '
                            'pallas 68.4 us (pallas blocks: best of the N=1 sweep); end to end (7B '
                            'decode b1, 32 layers, same run) pallas 5.79 ms/token (samples '
                            '11.8/5.79/4.90) vs reference 6.30 (10.5/6.30/5.45): the model-level '
                            'decode decides N=1'}]}

SWITCH = {(4096, 4096): {'blocks': {'block_out': 32,
                           'block_in': 128,
                           'steps': None,
                           'num_warps': 4,
                           'num_stages': 3},
                'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: best of the sweep, 0.341 ms for 8 '
                          'layers (0.56 of copy)'},
 (12288, 4096): {'blocks': {'block_out': 64,
                            'block_in': 64,
                            'steps': None,
                            'num_warps': 4,
                            'num_stages': 4},
                 'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: best of the sweep, 1.774 ms for 8 '
                           'layers (0.33 of copy)'},
 (22016, 4096): {'blocks': {'block_out': 64,
                            'block_in': 64,
                            'steps': None,
                            'num_warps': 4,
                            'num_stages': 4},
                 'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: best of the sweep, 1.635 ms for 8 '
                           'layers (0.63 of copy)'},
 (4096, 11008): {'blocks': {'block_out': 32,
                            'block_in': 256,
                            'steps': 4,
                            'num_warps': 4,
                            'num_stages': 3},
                 'source': 'NVIDIA H200 jax 0.11.2 2026-11-26: best of the sweep, 0.681 ms for 8 '
                           'layers (0.75 of copy)'}}
