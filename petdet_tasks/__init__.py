"""petdet_tasks: the petdet pipeline steps as plain functions (no Airflow import anywhere).

Each step is ``(inputs, config, store) -> outputs`` and runs without Airflow through
``python -m petdet_tasks STEP ...``; ``plugins/`` wraps each one in a thin operator.
"""

__version__ = "0.1.0"
