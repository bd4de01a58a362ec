"""What a `colab` run keeps on Google Drive, from the real file sizes of a rehearsal's stage-3 folder scaled to SDXL
1.0's text encoders: an estimate (no card has run `colab` yet), printed as a table.

    python benchmarks/drive_budget.py runs/rehearse-colab/03_distillation

Bytes per student parameter are read from the rehearsal's own files (the saved encoders and the newest
checkpoint's weights); the optimiser state is 8-bit AdamW's two bytes per parameter (bitsandbytes keeps two 8-bit
moments), which the CPU rehearsal cannot write (it trains with plain AdamW). Not a test: it prints.
"""

import sys
from pathlib import Path

from safetensors import safe_open

from jpsdxl.core.profiles import load_profile
from jpsdxl.notebook.overview import recipe_parameter_counts


def parameters(folder: Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers."""
    total = 0
    for f in folder.rglob("*.safetensors"):
        with safe_open(f, "pt") as weights:
            for key in weights.keys():
                n = 1
                for d in weights.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def main(stage3: str) -> None:
    stage3 = Path(stage3)
    colab = load_profile("colab")
    counts = recipe_parameter_counts("sdxl")
    sdxl = counts["text_encoder"] + counts["text_encoder_2"]
    students = [stage3 / "text_encoder", stage3 / "text_encoder_2"]
    params = sum(parameters(f) for f in students)
    saved = sum(f.stat().st_size for d in students for f in d.rglob("*.safetensors")) / params
    checkpoint = max((stage3 / "checkpoints").glob("step-*"))
    weights = (checkpoint / "model.safetensors").stat().st_size / params
    optimiser = 2.0  # 8-bit AdamW: two 8-bit moments a parameter (estimate; the CPU rehearsal used plain AdamW)
    one = sdxl * (weights + optimiser)
    kept = colab.distill.keep_checkpoints
    rows = {"students saved (text_encoder, text_encoder_2)": sdxl * saved,
            f"checkpoints: {kept} kept + 1 being written": (kept + 1) * one}
    print(f"rehearsal: {params:,} student parameters; {saved:.2f} B/param saved, {weights:.2f} B/param in a "
          f"checkpoint's weights (measured); SDXL 1.0's text encoders: {sdxl:,} parameters")
    for what, size in rows.items():
        print(f"{what:55} {size / 1e9:6.2f} GB (estimate)")
    print(f"{'peak on Drive (estimate)':55} {sum(rows.values()) / 1e9:6.2f} GB of a free 15 GB")


if __name__ == "__main__":
    main(sys.argv[1])
