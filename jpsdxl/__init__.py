"""jpsdxl: teach Stable Diffusion XL Japanese by retraining only its two text encoders (the SD-XL 1.0-jp recipe).

The recipe, one module per stage, each with a ``run(profile)``; the stage table (``core/runs.py``, ``STAGES``) says
what each reads and leaves, and the ``jpsdxl`` command, the runner and ``runs.require`` read it:

    data.py, lexicon.py          JA-EN sentence pairs (read, checked, split, streamed); a JMdict JA-EN lexicon
    1 tokenization.py            a Japanese sentencepiece tokenizer with SDXL's 77-token conventions
    2 embedding_init.py          each Japanese piece's most similar English CLIP token, by a multilingual embedder
      encoders.py                Japanese copies of the text encoders, their embedding rows started from stage 2
    3 distillation.py            train both copies to output what the frozen English encoders output
      checkpoints.py             its checkpoints: atomic, bit-exact resume, checked before trusted
      targets.py                 what is matched (hidden_states[-2] x2, text_embeds), the loss, the held-out metrics
    4 generation.py              base -> refiner with a latent hand-off; the models stage 4 compares
      assembly.py                the Japanese SDXL as two folders that plain diffusers loads

and, each in its own room:

    shapes/     the shapes world: a tiny SDXL that draws coloured shapes, and a judge (what `tiny` measures with)
    core/       plumbing: profiles, runs/ and the stage folders, hub downloads, the offline model zoo
    notebook/   what only the notebooks show: tables, plots, measurements, cost estimates
    cli.py      the ``jpsdxl`` command;  runner.py  the notebooks, executed in order by papermill

Imports only run downwards: core <- data <- stages 1-4 <- shapes.training, notebook, cli, runner, rehearsal
(``tests/test_environment.py`` checks it).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jpsdxl")  # one version, in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
