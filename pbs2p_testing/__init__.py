"""What the tests and the benchmarks build on: seeded tiny models and text (`tiny`), checks of artifacts
(`artifacts`), the real packaged model (`real`) and servers on loopback (`servers`: S3, the API).

Not part of the library's API; it ships so that `bench/` and the tests share one copy of each fixture."""
