#!/usr/bin/env node
'use strict';
// The CLI is compiled to dist/ by `npm run build`.
require('../dist/src/cli/main.js').main(process.argv.slice(2));
