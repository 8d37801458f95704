"""The code of the notebook series, one file per chapter; `gptj_helpers.py` beside it is the table of contents."""
