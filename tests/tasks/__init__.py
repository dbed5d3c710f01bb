"""One test module per task module of itm_engine/tasks/, and the checks across tasks."""
