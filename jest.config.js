/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json' }],
  },
  testTimeout: 120000,
  // Child-process tests run dist/: rebuilt first when a source is newer (test/global-setup.js).
  globalSetup: '<rootDir>/test/global-setup.js',
};
