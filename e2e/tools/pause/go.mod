module ninelives.invalid/e2e/tools/pause

go 1.22
