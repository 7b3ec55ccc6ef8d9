"""Runs in .venv-prefect for tests/test_orchestration.py (whose pytest runs in .venv, where Prefect cannot be installed):
one JSON request as the argument, one JSON answer on the last line of stdout. The Prefect API is the one PREFECT_API_URL names.

    {"serve": HOME}                                  a local Prefect server until stdin closes; prints its API URL first
    {"run": "retrain" | "monitor", "parameters": {}} the flow's final state, its message and result
    {"history": ["retrain", "monitor"]}              `run_history` of those flows
    {"apply": "prefect.yaml"}                        register its deployments; what the API then holds for each
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rehearsal's helpers, which the flows name by import path


def main(request: dict) -> object:
    from mlops_basics import orchestration as o
    if "serve" in request:
        with o.local_prefect_server(request["serve"]) as url:
            print(json.dumps(url), flush=True)
            sys.stdin.read()  # until the test closes the pipe
        return None
    if "run" in request:
        flow = {"retrain": o.retrain_flow, "monitor": o.monitor_flow}[request["run"]]
        state = flow(**request["parameters"], return_state=True)
        result = state.result(raise_on_failure=False)
        return {"state": state.name, "message": state.message, "flow_run_id": str(state.state_details.flow_run_id),
                "result": result if state.is_completed() else None}
    if "history" in request:
        return o.run_history(request["history"])
    if "apply" in request:
        from prefect import get_client
        ids = [d.apply() for d in o.deployments_from_yaml(request["apply"])]
        with get_client(sync_client=True) as client:
            held = [client.read_deployment(i) for i in ids]
        return [{"name": d.name, "parameters": d.parameters, "tags": sorted(d.tags), "crons": [s.schedule.cron for s in d.schedules],
                 "timezones": [s.schedule.timezone for s in d.schedules], "entrypoint": d.entrypoint} for d in held]
    raise ValueError(f"unknown request {request}")


if __name__ == "__main__":
    answer = main(json.loads(sys.argv[1]))
    if answer is not None: print(json.dumps(answer, default=str))
