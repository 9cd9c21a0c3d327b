"""Writes the Grafana dashboards in this directory (run: python dashboards/generate.py).

The JSON files are committed; this script is their source, so panels stay consistent (datasource
variable, job/run variables, units). Every expression names only metrics something exports:
raybig's own (`raybig/metrics.py`, exported as `ray_raybig_*`) or Ray's (`ray_train_*`, `ray_serve_*`,
`ray_node_*`). tests/test_dashboards_prometheus.py evaluates every one against a real Prometheus.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def var_datasource() -> dict[str, Any]:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0}


def var_query(name: str, query: str, label: str | None = None) -> dict[str, Any]:
    """A multi-select label_values variable with 'All' = any value (including the empty string)."""
    return {"name": name, "label": label or name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
            "sort": 1, "hide": 0}


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          desc: str = "", w: int = 12, h: int = 8) -> dict[str, Any]:
    return {"type": kind, "title": title, "description": desc, "datasource": DS,
            "gridPos": {"w": w, "h": h, "x": 0, "y": 0},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"datasource": DS, "expr": e, "legendFormat": lf, "refId": chr(65 + i)}
                        for i, (e, lf) in enumerate(targets)]}


def dashboard(uid: str, title: str, variables: list[dict[str, Any]], panels: list[dict[str, Any]],
              tags: list[str]) -> dict[str, Any]:
    x = y = 0
    for p in panels:  # simple two-column flow layout
        gp = p["gridPos"]
        if x + gp["w"] > 24:
            x, y = 0, y + gp["h"]
        gp["x"], gp["y"] = x, y
        x += gp["w"]
    for i, p in enumerate(panels, 1):
        p["id"] = i
    return {"uid": uid, "title": title, "tags": ["raybig", *tags], "schemaVersion": 39, "version": 1,
            "editable": True, "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
            "timezone": "browser", "graphTooltip": 1, "templating": {"list": [var_datasource(), *variables]},
            "annotations": {"list": []}, "panels": panels}


def hq(q: float, metric: str, sel: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def training() -> dict[str, Any]:
    s = 'job_name=~"$job_name", run=~"$run"'
    g = "max by (run)"
    return dashboard("raybig-training", "raybig / Training", [
        var_query("job_name", "label_values(ray_raybig_train_step, job_name)", "job"),
        var_query("run", 'label_values(ray_raybig_train_step{job_name=~"$job_name"}, run)'),
    ], [
        panel("Loss", [(f"{g} (ray_raybig_train_loss{{{s}}})", "{{run}} train"),
                       (f"{g} (ray_raybig_train_val_loss{{{s}}})", "{{run}} val")], "none",
              desc="Training loss (mean over ranks, last log window) and validation loss."),
        panel("Step", [(f"{g} (ray_raybig_train_step{{{s}}})", "{{run}}")], "none"),
        panel("Learning rate", [(f"{g} (ray_raybig_train_learning_rate{{{s}}})", "{{run}}")], "none"),
        panel("Throughput (tokens/s)",
              [(f"{g} (ray_raybig_train_throughput_tokens_per_second{{{s}}})", "{{run}} reported"),
               (f"sum by (run) (rate(ray_raybig_train_tokens_total{{{s}}}[{RI}]))", "{{run}} from counter")],
              "short"),
        panel("Step time", [(hq(0.5, "ray_raybig_train_step_time_seconds", s, "run"), "{{run}} p50"),
                            (hq(0.95, "ray_raybig_train_step_time_seconds", s, "run"), "{{run}} p95")], "s"),
        panel("Samples seen", [(f"{g} (ray_raybig_train_samples_seen{{{s}}})", "{{run}}")], "short"),
        panel("MFU", [(f"{g} (ray_raybig_train_mfu_ratio{{{s}}})", "{{run}}")], "percentunit",
              desc="Model FLOPs utilisation; absent when the hardware peak is unknown (CPU without "
                   "RAYBIG_PEAK_FLOPS)."),
        panel("Peak memory per worker", [(f"max by (run, rank) (ray_raybig_train_peak_memory_bytes{{{s}}})",
                                          "{{run}} rank {{rank}}")], "bytes"),
        panel("Checkpoint save time (mean)",
              [(f"max by (run) (ray_raybig_train_checkpoint_save_seconds_sum{{{s}}} / "
                f"ray_raybig_train_checkpoint_save_seconds_count{{{s}}})", "{{run}}")], "s"),
        panel("Ray Train controller state",
              [('max by (ray_train_run_name, ray_train_controller_state) '
                '(ray_train_controller_state{ray_train_run_name=~"$run"})',
                "{{ray_train_run_name}} {{ray_train_controller_state}}")], "none"),
        panel("Ray Train worker-group start and report blocking",
              [('max by (ray_train_run_name) (ray_train_worker_group_start_total_time_s'
                '{ray_train_run_name=~"$run"})', "{{ray_train_run_name}} worker group start"),
               ('max by (ray_train_run_name) (ray_train_report_total_blocked_time_s'
                '{ray_train_run_name=~"$run"})', "{{ray_train_run_name}} report blocked")], "s"),
        panel("Ray Train checkpoint sync and transfer",
              [('max by (ray_train_run_name) (ray_train_checkpoint_transfer_total_time_s'
                '{ray_train_run_name=~"$run"})', "{{ray_train_run_name}} transfer"),
               ('max by (ray_train_run_name) (ray_train_checkpoint_sync_total_time_s'
                '{ray_train_run_name=~"$run"})', "{{ray_train_run_name}} sync")], "s"),
    ], ["training"])


def sweeps() -> dict[str, Any]:
    s = 'sweep=~"$sweep"'
    return dashboard("raybig-sweeps", "raybig / Sweeps", [
        var_query("sweep", "label_values(ray_raybig_sweep_trials, sweep)"),
    ], [
        panel("Trials by state", [(f"max by (sweep, state) (ray_raybig_sweep_trials{{{s}}})",
                                   "{{sweep}} {{state}}")], "none"),
        panel("Best metric so far", [(f"max by (sweep, metric) (ray_raybig_sweep_best_metric{{{s}}})",
                                      "{{sweep}} {{metric}}")], "none"),
        panel("Trial validation loss", [('max by (trial) (ray_raybig_train_val_loss{trial!=""})', "{{trial}}")],
              "none", desc="Each sweep trial reports as a train run with a non-empty trial tag."),
        panel("Trial throughput (tokens/s)",
              [('max by (trial) (ray_raybig_train_throughput_tokens_per_second{trial!=""})', "{{trial}}")]),
    ], ["sweeps"])


def serving() -> dict[str, Any]:
    a = 'application=~"$application"'
    return dashboard("raybig-serving", "raybig / Serving", [
        var_query("application", "label_values(ray_serve_num_http_requests_total, application)"),
    ], [
        panel("HTTP requests/s by status", [(f"sum by (application, status_code) "
                                             f"(rate(ray_serve_num_http_requests_total{{{a}}}[{RI}]))",
                                             "{{application}} {{status_code}}")], "reqps"),
        panel("HTTP latency (Serve proxy)", [(hq(0.5, "ray_serve_http_request_latency_ms", a, "application"),
                                             "{{application}} p50"),
                                            (hq(0.99, "ray_serve_http_request_latency_ms", a, "application"),
                                             "{{application}} p99")], "ms"),
        panel("Completions/s by outcome (raybig)", [(f"sum by (application, status) (rate("
                                                     f"ray_raybig_serve_requests_total{{{a}}}[{RI}]))",
                                                     "{{application}} {{status}}")], "reqps"),
        panel("Serve 5xx errors", [(f'sum by (application) (rate(ray_raybig_serve_requests_total'
                                    f'{{{a}, status="server_error"}}[{RI}]))', "{{application}}")], "reqps"),
        panel("Request latency (raybig)", [
            (hq(0.5, "ray_raybig_serve_request_latency_seconds", a, "application"), "{{application}} p50"),
            (hq(0.95, "ray_raybig_serve_request_latency_seconds", a, "application"), "{{application}} p95")], "s"),
        panel("Time to first token", [
            (hq(0.5, "ray_raybig_serve_time_to_first_token_seconds", a, "application"), "{{application}} p50"),
            (hq(0.95, "ray_raybig_serve_time_to_first_token_seconds", a, "application"), "{{application}} p95")],
            "s"),
        panel("Generated tokens/s", [(f"sum by (application) (rate(ray_raybig_serve_generated_tokens_total"
                                      f"{{{a}}}[{RI}]))", "{{application}}")], "short"),
        panel("Batch size", [
            (f"sum by (application) (rate(ray_raybig_serve_batch_size_sum{{{a}}}[{RI}])) / "
             f"sum by (application) (rate(ray_raybig_serve_batch_size_count{{{a}}}[{RI}]))", "{{application}} mean"),
            # Rows per engine step. Serve's own ray_serve_actual_batch_size comes only from
            # @serve.batch, which the continuous-batching engine does not use.
            (hq(0.95, "ray_raybig_serve_batch_size", a, "application"), "{{application}} p95")], "short"),
        panel("Replica processing latency", [
            (hq(0.95, "ray_serve_deployment_processing_latency_ms", a, "application, deployment"),
             "{{application}}/{{deployment}} p95")], "ms"),
        panel("Replicas and queue", [
            (f"max by (application, deployment) (ray_serve_autoscaling_target_replicas{{{a}}})",
             "{{deployment}} target replicas"),
            (f"sum by (application, deployment) (ray_serve_replica_processing_queries{{{a}}})",
             "{{deployment}} processing"),
            (f"sum by (application, deployment) (ray_serve_deployment_queued_queries{{{a}}})",
             "{{deployment}} queued")], "short"),
    ], ["serving"])


def cluster() -> dict[str, Any]:
    p = 'priority=~"$priority"'
    return dashboard("raybig-cluster", "raybig / Cluster and queue", [
        var_query("priority", "label_values(ray_raybig_scheduler_queue_depth, priority)"),
    ], [
        panel("Queue depth by priority", [(f"max by (priority) (ray_raybig_scheduler_queue_depth{{{p}}})",
                                           "priority {{priority}}")], "none"),
        panel("Queue wait time", [(hq(0.5, "ray_raybig_scheduler_wait_time_seconds", p, "priority"), "p50 {{priority}}"),
                                  (hq(0.95, "ray_raybig_scheduler_wait_time_seconds", p, "priority"),
                                   "p95 {{priority}}")], "s"),
        panel("Admissions", [(f"sum by (priority) (increase(ray_raybig_scheduler_admissions_total{{{p}}}[{RI}]))",
                              "priority {{priority}}")], "none"),
        panel("Retries", [
            (f"sum by (priority, reason) (increase(ray_raybig_scheduler_retries_total{{{p}}}[{RI}]))",
             "retries {{priority}} {{reason}}")], "none"),
        panel("Alive nodes", [("max(ray_cluster_active_nodes)", "nodes")], "none"),
        panel("CPU utilisation by node", [("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}")],
              "percent"),
        panel("Memory used by node", [("max by (instance) (ray_node_mem_used)", "{{instance}} used"),
                                      ("max by (instance) (ray_node_mem_total)", "{{instance}} total")], "bytes"),
        panel("Disk free by node", [("min by (instance) (ray_node_disk_free)", "{{instance}}")], "bytes"),
        panel("Network by node", [("sum by (instance) (ray_node_network_receive_speed)", "{{instance}} rx"),
                                  ("sum by (instance) (ray_node_network_send_speed)", "{{instance}} tx")], "Bps"),
    ], ["cluster", "scheduler"])


DASHBOARDS = {"raybig-training.json": training, "raybig-sweeps.json": sweeps,
              "raybig-serving.json": serving, "raybig-cluster.json": cluster}


def main() -> None:
    for fname, build in DASHBOARDS.items():
        (HERE / fname).write_text(json.dumps(build(), indent=2) + "\n")
        print(f"wrote dashboards/{fname}")


if __name__ == "__main__":
    main()
