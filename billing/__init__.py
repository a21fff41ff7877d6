"""``token-scaler cost``: a cloud billing export and token counts, reconciled into a cost per 1k tokens."""
