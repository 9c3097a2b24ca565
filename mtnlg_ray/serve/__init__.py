"""Ray Serve generator: an OpenAI-compatible HTTP API over a checkpoint, with continuous batching.

`build_app` is the import path for `serve run` / `serve deploy` (`mtnlg_ray.serve:build_app`);
`serve_model` is what `mtnlg-ray serve` calls.
"""

from mtnlg_ray.serve.app import ServeArgs, build_app, serve_model

__all__ = ["ServeArgs", "build_app", "serve_model"]
