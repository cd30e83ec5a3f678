"""The mlkube operator: TrainingRun -> KubeRay RayJob, ModelDeployment -> KServe InferenceService.

Handlers (handlers.py) are thin; the builders (rayjob.py, inferenceservice.py), the status
mapping (status.py) and the rollout decisions (rollout.py) are pure functions. The operator
never imports ray, torch or prefect: its image stays small.
"""
