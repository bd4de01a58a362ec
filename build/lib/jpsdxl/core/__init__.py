"""The plumbing every stage stands on, none of it specific to a stage.

    profiles.py        a profile (jpsdxl/profiles/*.toml) as checked dataclasses: sizes and sources as data
    runs.py            where outputs go (runs/, the cache), the stage folders, atomic writes
    hub.py             a hub id or folder -> a local folder, fetching only what from_pretrained reads
    zoo.py             SDXL built offline from configs (tiny, shapes, sdxl recipes) as diffusers folders
    models.py          every model a profile names -> a folder (zoo or hub), one error for all missing ones
    clip_tokenizer.py  SDXL's two CLIP tokenizers rebuilt from open_clip's BPE vocabulary (a leaf)
"""
