"""The KServe V2 gRPC API's protocol definition and the classes `make proto` generates from it."""
