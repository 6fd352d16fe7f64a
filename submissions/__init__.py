"""Submissions: RLE, submission writer and validator, local scorer, leaderboard CSV.

numpy / pandas / pillow only: this package imports neither torch nor any other package of the
project, so scoring a CSV or printing the leaderboard works without the training stack.

Modules: ``rle`` (encode / decode), ``writer`` (``write_submission``, ``validate_submission``),
``score`` (``python -m submissions.score``), ``leaderboard`` (``python -m submissions.leaderboard``).
"""
