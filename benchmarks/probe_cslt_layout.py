# SPDX-License-Identifier: Apache-2.0
"""Find where cuSPARSELt stores each group's 4-bit code, by compressing known patterns (run on the GPU).

Every group of a 256x256 matrix gets a 14-bit id; experiment ``b`` keeps features {2,3} in the groups whose id has
bit ``b`` set and {0,1} elsewhere. A metadata bit that flips exactly in the experiments of bit set ``id`` belongs
to group ``id``. The found positions are compared with :func:`elas_megatron.kernels.layout.cslt_meta_positions`
and the values region with the row-major kept values. Usage: ``python benchmarks/probe_cslt_layout.py [out.pt]``.
"""
from __future__ import annotations

import sys

import torch

from elas_megatron.kernels.layout import cslt_meta_positions


def _dense_with_pattern(high: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Groups with ``high`` True keep features {2,3} (values 3, 4), others {0,1} (values 1, 2)."""
    g = torch.zeros(rows * cols // 4, 4, device="cuda")
    g[~high, 0], g[~high, 1] = 1.0, 2.0
    g[high, 2], g[high, 3] = 3.0, 4.0
    return g.reshape(rows, cols).to(torch.bfloat16)


def _meta_bits(buf: torch.Tensor, n_vals: int) -> torch.Tensor:
    words = buf[n_vals:].view(torch.int16).to(torch.int32) & 0xFFFF
    return ((words[:, None] >> torch.arange(16, device="cuda")) & 1).reshape(-1)


def main() -> None:
    rows = cols = 256
    n_groups, n_bits = rows * cols // 4, 14
    ids = torch.arange(n_groups, device="cuda")
    n_vals = rows * cols // 2
    base_buf = torch._cslt_compress(_dense_with_pattern(torch.zeros_like(ids, dtype=torch.bool), rows, cols)).reshape(-1)
    print(f"compressed numel {base_buf.numel()} (rows*cols*9/16 = {rows * cols * 9 // 16})")
    base = _meta_bits(base_buf, n_vals)
    print("base metadata words (first 8):", [hex(int(w) & 0xFFFF) for w in base_buf[n_vals:n_vals + 8].view(torch.int16)])
    sig = torch.zeros_like(base, dtype=torch.int64)
    values_ok = True
    for b in range(n_bits):
        high = ((ids >> b) & 1).bool()
        dense = _dense_with_pattern(high, rows, cols)
        buf = torch._cslt_compress(dense).reshape(-1)
        kept = dense.reshape(-1, 4)
        kept = torch.where(high[:, None], kept[:, 2:], kept[:, :2]).reshape(rows, cols // 2)
        values_ok &= torch.equal(buf[:n_vals].view(rows, cols // 2), kept)
        sig |= (_meta_bits(buf, n_vals) != base).to(torch.int64) << b
    print("values region is row-major kept values:", values_ok)
    # Expected: group (row i, group g) at (word, nibble) of layout.py; bits 1 and 3 of the nibble flip.
    word, nibble = cslt_meta_positions(rows, cols, "cuda")                # [rows, cols/4]
    expect_pos = (word * 16 + nibble * 4).reshape(-1)
    found_ok = (sig[expect_pos + 1] == ids) & (sig[expect_pos + 3] == ids)
    n_ok = int(found_ok[1:].sum())
    print(f"groups whose code sits where layout.py says: {n_ok}/{n_groups - 1}")
    if len(sys.argv) > 1:
        torch.save({"sig": sig.cpu(), "base": base.cpu(), "rows": rows, "cols": cols}, sys.argv[1])


if __name__ == "__main__":
    main()
