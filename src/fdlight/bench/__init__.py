"""Benchmarks: `python -m fdlight.bench` times one distillation (or, with --finetune, fine-tuning) step;
`python -m fdlight.bench.segment` times ViT-B/16 + UPerNet at 512 px on a GPU; `python -m fdlight.bench.attention` times
the diagnose stage's attention statistics on a GPU; `python -m fdlight.bench.data` times a stage's training data path on
ImageNet-like JPEGs; `python -m fdlight.bench.fit` times a distillation run's Lightning fit beside the bare step."""
