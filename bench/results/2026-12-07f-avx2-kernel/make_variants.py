#!/usr/bin/env python3
"""Writes variants.cpp: src/core/small_gemm.cpp with the AVX2 kernel's k chunk and its packing of b
made switchable at run time (globals g_chunk, g_in_place), for small_gemm_avx2.cpp to time
against each other. In place, full 16-column panels read b through its own row stride; the
shipped kernel (g_in_place false, g_chunk 256) copies each chunk of a panel first."""
import pathlib
import sys

source = pathlib.Path(sys.argv[1]).read_text()
edits = [
    ("constexpr int64_t kAvx2KChunk = 256;",
     "}\nint64_t g_chunk = 256;\nbool g_in_place = false;\nthread_local int64_t g_ldb = 16;\nnamespace {\n#define kAvx2KChunk g_chunk"),
    ("alignas(64) float panel[kAvx2KChunk * kColumns];", "alignas(64) float panel[256 * kColumns];"),
    ("_mm256_load_ps(b_k + 8 * v)", "_mm256_loadu_ps(b_k + 8 * v)"),
    ("a_row, a_col, panel, kColumns, out", "a_row, a_col, panel, g_ldb, out"),
    ("      if (width == kColumns) {\n        for (int64_t k = 0; k < kc; ++k) {",
     "      if (g_in_place && width == kColumns) {\n        g_ldb = ldb;\n"
     "        rows_of_panel_avx2(m_size, width, kc, a + k0 * a_col, a_row, a_col, b_panel, out + n0, ldo, add_chunk);\n"
     "        g_ldb = kColumns;\n        continue;\n      }\n      if (width == kColumns) {\n"
     "        for (int64_t k = 0; k < kc; ++k) {"),
]
for old, new in edits:
    if source.count(old) < 1:
        sys.exit(f"make_variants.py: not found in the source: {old!r}")
    source = source.replace(old, new)
pathlib.Path("variants.cpp").write_text(source)
