"""The maths of AE-KD, with torch only: teacher weighting (``weighting``), distillation losses
(``losses``), one distillation step (``step``) and evaluation metrics (``metrics``).

No Ray, no MLflow, no file or device handling: tensors in, tensors out.
"""
