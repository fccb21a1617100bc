"""Measured kernel settings per shape on a GPU; read by `pallas_kernels.dispatch` only.

Regenerate from a GPU run: `scripts/gpu_check.sh` writes an updated copy of this file to
$OUT/tuning.py (its measured sweeps and kernel-vs-XLA timings merged into the entries below);
review the diff and commit it here. Every entry says where its numbers came from; shapes
without an entry use the dispatch's fallback (XLA for the op, heuristic blocks), which is
unmeasured by definition.

UNMERGED[(out, in)] = list of entries, each for row counts N <= n_max (ascending):
  impl: "pallas" | "mosaic" | "reference" (XLA): the fastest measured at that N;
  blocks: keyword arguments of `lora_unmerged_pallas` (mosaic_blocks: of the Mosaic kernel;
  fused_blocks: of `lora_fused_pallas`, which the dispatch runs at N <= 16).
SWITCH[(out, in)]: blocks of `merge_delta_pallas`.
"""

# fmt: off
DEVICE = 'NVIDIA H200'
JAX = '0.11.2'
DATE = '2026-11-26'

UNMERGED = {}

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
