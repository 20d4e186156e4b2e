"""The passes of onnxprune, one per file (installed as `onnxprune.passes`).

A pass is one stage with the contract of onnxprune.pipeline: settings in its constructor,
`run(model, context)` returning the model and its part of the report. In the order the
pruning pipeline runs them:

- validate.ValidateInput: refuse malformed graphs, record what the output must preserve
- calibration.LoadCalibration: read calibration data
- layers.RemoveLayers: remove whole residual blocks
- analyze.Analyze: shapes and channel dependencies (groups, barriers)
- recovery.Recover: training-free compensation, installed around channel removal
- plan.PlanChannels: score channels and decide how many each group loses
- channels.RemoveChannels: slice the planned channels out
- sparsity.Sparsify: zero weights of the layers that are left (unstructured, N:M, blocks)
- verify.Verify: check against the original, roll back what breaks it
- measure.Measure: params, MACs, size and latency before and after
- quantize.Quantize: int8 (QDQ, calibrated) or fp16 for deployment
- sparsity.StoreSparse: write weights that are mostly zeros as sparse tensors
- handover.HandOver: checks and files for a back end (--target tensorrt, ort-mobile, cpu)
- latency.TargetLatency: search the MAC budget that meets a latency target

Each file also declares its pass's settings; `onnxprune.api.PruneOptions` and the CLI options
are made from them.
"""
