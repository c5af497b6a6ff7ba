"""Metrics plot: reward per model, eps, clip fractions, SFT loss and ratio over iterations."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .common import CATEGORY, Run, is_main_process, pil_to_comfy


class MetricsPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOMetricsPlot",
            display_name="Metrics plot (TreeRPO)",
            category=CATEGORY,
            description="Plots the run's metrics over iterations: reward per model, eps, clip fractions, "
                        "SFT loss, importance ratio, group reward spread.",
            is_output_node=True,
            inputs=[
                Run.Input("run", tooltip="The run from a GRPO trainer step."),
                io.String.Input("title", default="", tooltip="Title above the panels (default: the run folder)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The plot.")],
        )

    @classmethod
    def execute(cls, run, title) -> io.NodeOutput:
        from ..core.plots import plot_metrics

        img = pil_to_comfy(plot_metrics(run.run.history, title=title or run.run.folder.name))
        return io.NodeOutput(img, ui=ui.PreviewImage(img, cls=cls) if is_main_process() else None)


NODES = [MetricsPlot]
