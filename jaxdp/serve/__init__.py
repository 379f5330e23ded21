"""`jaxdp serve`: a private fine-tuning service.

    upload (perturbed in the browser) -> DP-LoRA job (a worker process) -> download

- `jaxdp.serve.db`: the database (SQLite in the workdir by default, any SQLAlchemy URL):
  tenants and their hashed API keys, datasets, jobs, progress events, the privacy ledger.
- `jaxdp.serve.jobs`: what a job is (its spec, its privacy plan and ledger check at
  submission, the run config) and the worker that claims jobs and runs them with the library.
- `jaxdp.serve.app`: the FastAPI app: the web page and the REST API (OpenAPI at /docs).
- `jaxdp.perturb`: the word-level metric-DP mechanism the page applies before uploading.

Everything a job writes lives under W/tenants/<tenant>/jobs/<id>/, a normal jaxdp workdir.
"""
