"""`raybig export RUN_OR_CHECKPOINT [--out DIR]`: a save_pretrained folder from any checkpoint."""

from __future__ import annotations

import json

import click

from raybig.cli.app import main, out


@main.command("export")
@click.argument("source", metavar="RUN_OR_CHECKPOINT")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where to write the folder (default: <run>/export for a run, <run>/export-<checkpoint> "
                   "for one of its checkpoints). Any fsspec URI.")
@click.option("--spec", "spec_path", default=None, metavar="SPEC",
              help="The train spec, for a checkpoint copied out of its run directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def export_cmd(source: str, out_dir: str | None, spec_path: str | None, as_json: bool) -> None:
    """Write a `save_pretrained` folder (transformers loads it) from a run, a checkpoint or an old export.

    RUN_OR_CHECKPOINT is a run directory (its newest checkpoint), a DeepSpeed checkpoint folder of
    any ZeRO stage (its shards consolidated with DeepSpeed's zero_to_fp32), or an export in the
    layout before save_pretrained (rewritten; needs --out). Not a checkpoint: exit 2; a checkpoint
    with missing files: exit 1.
    """
    from raybig.train.export import export_from

    written, what = export_from(source, out_dir, spec_path)
    if as_json:
        print(json.dumps({"export": written, "source": what}), file=out.file)
    else:
        out.print(f"wrote {written} (from {what})", markup=False)
