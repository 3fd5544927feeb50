"""What is learned: the Task interface (batch, loss, metrics, evaluation, predictions, export, checkpoint fields) and one module per task."""
