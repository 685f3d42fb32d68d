"""Model layers for Megatron-Core layer specs: CoLA low-rank linears, the ELAS/CoLA FFNs, SDPA, SP RMSNorm."""
