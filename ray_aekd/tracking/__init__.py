"""MLflow and reports: runs and their metrics (``runs``), the student's MLflow model, the calls the
Ray layer makes on a run by id (``client``: create, log, tag, finish), Tune trials' runs
(``trial_runs``), evaluation of any model on a labelled split (``evaluate``), comparing runs
(``compare``), plots, and uploading a finished run folder (``upload``).

The only layer that imports ``mlflow``; it never imports ``ray``.
"""
