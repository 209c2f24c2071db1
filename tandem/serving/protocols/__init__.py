"""Wire codecs of the tensor kind's protocols: pure functions (bytes <-> numpy and JSON), no I/O.

`v2` is KServe v2 / the Open Inference Protocol with Triton's binary-tensor extension; the routes
that use it are in `tandem/serving/tensor_routes.py`.
"""
