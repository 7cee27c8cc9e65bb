package zarkov.javaserver;

import java.util.List;
import java.util.stream.Collectors;

import org.h2.mvstore.MVMap;
import org.h2.mvstore.MVStore;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.h2.H2Database;

/**
 * The H2 backend's database, with renames that survive a restart.
 *
 * <p>mongo-java-server 1.47's {@code H2Database.moveCollection} renames the collection
 * in memory first and then looks up its H2 maps under the <em>new</em> name, so the
 * documents (and the {@code _id} index) stay in maps named after the old collection:
 * after a restart the renamed collection is empty. Zarkov renames a staging collection
 * over its target at the end of every full run, so this class renames the maps the
 * collection really uses: its documents, its metadata and each of its indexes.
 */
final class RenamingH2Database extends H2Database {

    private static final String DATA = "databases.";
    private static final String META = "meta.";
    private static final String INDEX = "._index_";

    private final MVStore store;

    RenamingH2Database(String name, MVStore store, CursorRegistry cursors) {
        super(name, store, cursors);
        this.store = store;
    }

    @Override
    public void moveCollection(MongoDatabase oldDatabase, MongoCollection<?> collection,
                               String newCollectionName) {
        String oldName = collection.getFullName();
        String newName = getFullCollectionNamespace(newCollectionName);
        List<String> indexMaps = store.getMapNames().stream()
            .filter(n -> n.startsWith(oldName + INDEX))
            .collect(Collectors.toList());
        super.moveCollection(oldDatabase, collection, newCollectionName);
        renameMap(DATA + oldName, DATA + newName);
        renameMap(META + oldName, META + newName);
        for (String index : indexMaps) {
            renameMap(index, newName + index.substring(oldName.length()));
        }
    }

    /** Give map {@code from} the name {@code to}, replacing a map of that name. */
    private void renameMap(String from, String to) {
        if (from.equals(to) || !store.hasMap(from)) {
            return;
        }
        if (store.hasMap(to)) {
            store.removeMap(to);
        }
        MVMap<Object, Object> map = store.openMap(from);
        store.renameMap(map, to);
    }
}
