"""What the notebooks show that the recipe itself does not need: tables, plots, measurements and cost estimates.

    overview.py   notebook 00: environment, profiles, the conditioning diagram, parameter counts
    tables.py     notebook 01: tokens per character, overflow, the 77-position layout side by side
    measure.py    notebooks 00 and 04: judged generation, sentence agreement, CLIP score, time and memory
    costs.py      notebook 03: FLOPs per pair, hours for the card's 41.4M pairs at a measured rate
    plotting.py   Japanese fonts, image grids, training curves
    claims.py     each reading's claims, checked beside its text and saved with the metrics
    phrasings.py  notebook 04's experiment: which training phrasings teach an unseen one
    colab.py      each notebook's Colab setup: install, and keep runs/ on Google Drive

Nothing in the four stages imports from here.
"""
