//go:build race

package image

// raceEnabled scales the long randomized tests down under the race
// detector, which makes them ten times slower and finds nothing more in
// their single-goroutine parts; the plain run keeps the full count.
const raceEnabled = true
