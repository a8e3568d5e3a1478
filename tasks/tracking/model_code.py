"""The code of every registered ms2rgb pyfunc model (MLflow "models from code").

StageTracker.log_pyfunc_model logs this file as the model with model_config
``{"pyfunc": "<class name>"}``. MLflow runs it whenever the model is loaded (``load_model``,
``mlflow models serve``); it hands MLflow an empty instance of that class from
tasks/tracking/pyfunc.py, whose ``load_context`` rebuilds the torch module from the logged
weight files. Nothing is pickled. Only MLflow runs this file; nothing imports it.
"""

from mlflow.models import ModelConfig, set_model

from ms2rgb.tasks.tracking.pyfunc import PYFUNCS

set_model(PYFUNCS[ModelConfig().get("pyfunc")]())
