"""petdet's Airflow-facing code: thin operators over ``petdet_tasks`` (no TensorFlow at import)."""
