"""Stand-in for modules.ui_components on gradio-4 webuis (Forge), whose real one patches gradio's internals."""
import gradio as gr


class FormComponent:
    pass


class ToolButton(FormComponent, gr.Button):
    pass


class FormRow(FormComponent, gr.Row):
    pass


class InputAccordion(gr.Checkbox):
    def extra(self):
        return gr.Column()
