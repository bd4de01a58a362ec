"""jpsdxl: teach Stable Diffusion XL Japanese by retraining only its two text encoders (the SD-XL 1.0-jp recipe).

One module per stage of the recipe, each named for it:

    data.py              JA-EN pairs and a JA-EN lexicon: fetch, read, check, split (files, Tatoeba, streams)
    clip_tokenizer.py    SDXL's two CLIP tokenizers, rebuilt offline (a leaf module)
    tokenization.py      stage 1: a Japanese tokenizer with SDXL's conventions; prompts in, ids out
    tokenizer_tables.py  notebook 01's measurements and tables
    encoders.py          Japanese copies of the text encoders (config ids, weights, embedding rows)
    generation.py        stage 4: base -> refiner with a latent hand-off

and the plumbing: profiles.py (sizes as data), zoo.py (offline tiny SDXL), hub.py (hub id / folder / zoo
resolution), runs.py (artefacts, atomic writes), plotting.py (Japanese fonts), overview.py (notebook 00),
runner.py and cli.py (papermill runner, ``jpsdxl`` command).
"""

__version__ = "0.1.0"
