# Stage: the papers' figures (dpotox.outputs.figures), one rule per figure, named as the figure. A
# figure reads only the CSV and Parquet tables of earlier stages, so
#   snakemake results/figures/<model>/fig1a_layer_projections.png --forcerun fig1a_layer_projections
# redraws that figure in seconds and recomputes nothing upstream. {scope} is a model, or
# all-models (a row of panels per model; made when the config has several models). Drawing
# takes seconds and little memory, so on a cluster the figures are drawn where Snakemake runs.

for _fig in FIGURES.values():

    rule:
        name:
            _fig.name
        input:
            figure_tables(_fig.name),
        output:
            png=report(
                f"results/figures/{{scope}}/{_fig.name}.png",
                caption=f"../report/figures/{_fig.name}.rst",
                category="Figures",
                subcategory="{scope}",
                labels={"figure": _fig.paper, "models": "{scope}"},
            ),
            pdf=f"results/figures/{{scope}}/{_fig.name}.pdf",
        log:
            f"logs/figures/{{scope}}/{_fig.name}.log",
        benchmark:
            f"benchmarks/figures/{{scope}}/{_fig.name}.tsv"
        wildcard_constraints:
            scope="|".join(re.escape(s) for s in FIGURE_SCOPES),
        localrule: True
        conda:
            "../../envs/dpotox.yaml"
        params:
            figure=_fig.name,
            tables=figure_table_paths(_fig.name),
            cfg=rule_params(config, "figure"),
        script:
            "../scripts/figure.py"
