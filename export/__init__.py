"""Export stage: checkpoint -> verified ONNX bundle (docs/bundle-format.md), plus optional TensorRT engines.

    dpkit-export runs/tiny --out bundles/tiny

    from dpkit.export import export_bundle
    summary = export_bundle("runs/tiny", "bundles/tiny", ddim_steps=(10,))

Modules: `onnx_export` (PyTorch -> ONNX), `schedule` (the manifest's scheduler arrays, from diffusers),
`verify` (ONNX Runtime vs PyTorch parity), `tensorrt` (engines), `writer` (`export_bundle`, `write_bundle`
and the manifest writer), `cli` (the command).
This is the only writer of bundles; `dpkit.runtime` reads them and never imports this package.
"""


def __getattr__(name: str):
    # `from dpkit.export import export_bundle` without importing torch/onnx for `import dpkit.export`.
    if name == "export_bundle":
        from dpkit.export.writer import export_bundle

        return export_bundle
    raise AttributeError(f"module 'dpkit.export' has no attribute {name!r}")
