"""`medhallguard eval`: predictions in MedHallTune's upload format, reference and guard metrics, reports.

cli.py owns the flow (load data, run the model, measure, write); run.py runs
requests in-process or over gRPC; text_metrics.py compares answers with
reference answers; guard_metrics.py measures the guard's scores; judge.py is
the optional LLM judge; report.py renders Markdown.
"""
