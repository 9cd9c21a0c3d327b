"""Serving raybig exports on Ray Serve (`kind: serve`) and sweep->train->serve pipelines.

- `app.build_app(args)`: the Serve app builder (`import_path: raybig.serve.app:build_app`).
- `deploy.serve_config(spec)` / `deploy.deploy(spec, dashboard_address)`: Serve's declarative config,
  and deploying it through the dashboard REST API (what `raybig submit` calls); `deploy.status`,
  `deploy.delete_app` back `raybig serve status|down`.
- `engine`: batched KV-cache generation and int8 quantization; `schema`: the OpenAI request/response.
- `local.run_serve`: `raybig run serve.yaml`; `pipeline.run_pipeline`: `kind: pipeline`.
"""
