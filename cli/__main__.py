from dynamo_vllm.cli.main import main

main()
